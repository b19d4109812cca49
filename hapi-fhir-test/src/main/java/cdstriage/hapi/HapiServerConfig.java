package cdstriage.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.LoggingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

import java.time.Duration;
import java.util.Properties;
import java.util.Set;
import javax.sql.DataSource;

/**
 * The Spring configuration of the test server: HAPI's own JPA, R4, subscription and batch
 * configurations, plus the few beans a JPA server must supply itself (database, entity manager,
 * settings, the REST servlet).
 *
 * <p>Settings are those of the {@code hapiproject/hapi} image that cds-triage needs
 * (hapi-fhir-test/hapi.env), everything else at the image's defaults:
 * <ul>
 *   <li>rest-hook Subscriptions on (channel types: rest-hook only);</li>
 *   <li>client-assigned ids: ALPHANUMERIC (a PUT may create {@code Patient/p-1}, not {@code Patient/123});</li>
 *   <li>no reuse of cached search results (0 ms): every search reads the database;</li>
 *   <li>referential integrity enforced on write and delete, no external references (the image's defaults);</li>
 *   <li>all R4 resource types.</li>
 * </ul>
 * System properties: {@code hapi.datasource.url} (default H2 in memory),
 * {@code hapi.subscription.polling_interval_ms} (default 5000, HAPI's), {@code hapi.log_requests} (true).
 */
@Configuration
@EnableTransactionManagement
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	SubscriptionSubmitterConfig.class,
	SubscriptionProcessorConfig.class,
	SubscriptionChannelConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	ThreadPoolFactoryConfig.class
})
public class HapiServerConfig {

	/** References to these are logical (terminology), as in the image's application.yaml. */
	private static final Set<String> LOGICAL_URLS = Set.of(
			"http://terminology.hl7.org/*", "https://terminology.hl7.org/*",
			"http://snomed.info/*", "https://snomed.info/*",
			"http://unitsofmeasure.org/*", "https://unitsofmeasure.org/*",
			"http://loinc.org/*", "https://loinc.org/*");

	@Bean
	public DataSource dataSource() {
		BasicDataSource dataSource = new BasicDataSource();
		dataSource.setDriver(new org.h2.Driver());
		dataSource.setUrl(System.getProperty("hapi.datasource.url", "jdbc:h2:mem:hapi;DB_CLOSE_DELAY=-1"));
		dataSource.setUsername("sa");
		dataSource.setPassword("");
		dataSource.setMaxTotal(10);
		dataSource.setMaxWait(Duration.ofSeconds(30));
		return dataSource;
	}

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setDataSource(dataSource);
		Properties jpa = new Properties();
		jpa.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		jpa.put("hibernate.hbm2ddl.auto", "update");
		jpa.put("hibernate.format_sql", "false");
		jpa.put("hibernate.show_sql", "false");
		jpa.put("hibernate.jdbc.batch_size", "20");
		jpa.put("hibernate.cache.use_query_cache", "false");
		jpa.put("hibernate.cache.use_second_level_cache", "false");
		jpa.put("hibernate.cache.use_structured_entries", "false");
		jpa.put("hibernate.cache.use_minimal_puts", "false");
		jpa.put("hibernate.search.enabled", "false"); // no Lucene/Elasticsearch full-text index
		jpa.put("hibernate.physical_naming_strategy",
				"org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy");
		factory.setJpaProperties(jpa);
		return factory;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		JpaTransactionManager manager = new JpaTransactionManager();
		manager.setEntityManagerFactory(entityManagerFactory);
		return manager;
	}

	@Bean
	public JpaStorageSettings storageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		settings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ALPHANUMERIC);
		settings.setReuseCachedSearchResultsForMillis(0L);
		settings.setEnforceReferentialIntegrityOnWrite(true);
		settings.setEnforceReferentialIntegrityOnDelete(true);
		settings.setAllowExternalReferences(false);
		settings.setAllowContainsSearches(true);
		settings.setFilterParameterEnabled(true);
		settings.setTreatReferencesAsLogical(new java.util.HashSet<>(LOGICAL_URLS));
		settings.setExpireSearchResultsAfterMillis(Duration.ofMinutes(60).toMillis());
		return settings;
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		SubscriptionSettings settings = new SubscriptionSettings();
		settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
		settings.setSubscriptionIntervalInMs(Long.getLong("hapi.subscription.polling_interval_ms", 5000L));
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	/** Subscription delivery wants an e-mail sender even with e-mail subscriptions off. */
	@Bean
	public IEmailSender emailSender() {
		return details -> {};
	}

	@Bean
	public IBinaryStorageSvc binaryStorageSvc() {
		return new DatabaseBinaryContentStorageSvcImpl();
	}

	@Bean
	public RestfulServer restfulServer(
			FhirContext fhirContext,
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			DatabaseBackedPagingProvider pagingProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport) {
		RestfulServer server = new RestfulServer(fhirContext);
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilities.setImplementationDescription("HAPI FHIR R4 Server (cds-triage hapi-fhir-test)");
		server.setServerConformanceProvider(capabilities);
		pagingProvider.setDefaultPageSize(20); // the image's defaults
		pagingProvider.setMaximumPageSize(Integer.MAX_VALUE);
		server.setPagingProvider(pagingProvider);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.setDefaultPrettyPrint(true);
		if (Boolean.parseBoolean(System.getProperty("hapi.log_requests", "true"))) {
			LoggingInterceptor requests = new LoggingInterceptor();
			requests.setLoggerName("fhirtest.access");
			requests.setMessageFormat(
					"${operationType} ${requestUrl} ${idOrResourceName} answered in ${processingTimeMillis} ms");
			requests.setErrorMessageFormat("ERROR ${operationType} ${requestUrl} - ${exceptionMessage}");
			requests.setLogExceptions(true);
			server.registerInterceptor(requests);
		}
		return server;
	}
}
