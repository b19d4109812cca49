package cdstriage.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.validation.JpaValidationSupportChain;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.IInstanceValidatorModule;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.utilities.npm.NpmPackage;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.ApplicationContext;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;

/**
 * The strict mode of the test server: what a hospital's validating HAPI does.
 *
 * <ul>
 *   <li>{@code -Dhapi.validation.packages=a.tgz,b.tgz}: FHIR NPM packages (e.g. cds-triage's own, written by
 *       {@code cds-triage fhir-package}, and HL7 Terminology {@code hl7.terminology.r4}) whose CodeSystems,
 *       ValueSets and StructureDefinitions go to the front of the JPA server's validation support chain, so
 *       {@code $validate}, the request validator and {@code CodeSystem/$validate-code} know them (and a newer
 *       copy of an HL7 code system wins over the one bundled with HAPI);</li>
 *   <li>{@code -Dhapi.validate_requests=true}: HAPI's {@link RequestValidatingInterceptor} validates every
 *       create, update and transaction with the server's instance validator and refuses (HTTP 422) a request
 *       whose validation finds an error; warnings are returned in a response header only.</li>
 * </ul>
 * Without either property the server behaves as before (structural parsing only).
 */
final class StrictValidation {

	private static final Logger ourLog = LoggerFactory.getLogger(StrictValidation.class);
	/** The conformance resources a package contributes to validation. */
	private static final String[] LOADED_TYPES = {"CodeSystem", "ValueSet", "StructureDefinition"};

	private StrictValidation() {}

	static void configure(ApplicationContext spring, RestfulServer server) throws IOException {
		FhirContext fhirContext = spring.getBean(FhirContext.class);
		String packages = System.getProperty("hapi.validation.packages", "").trim();
		if (!packages.isEmpty()) {
			JpaValidationSupportChain chain = spring.getBean(JpaValidationSupportChain.class);
			List<String> names = new ArrayList<>();
			PrePopulatedValidationSupport loaded = new PrePopulatedValidationSupport(fhirContext);
			for (String file : packages.split(",")) {
				if (!file.isBlank()) {
					names.add(load(fhirContext, Path.of(file.trim()), loaded));
				}
			}
			chain.addValidationSupport(0, loaded);
			chain.invalidateCaches();
			ourLog.info("validation packages loaded: {} ({} conformance resources)", names, loaded.countAll());
		}
		if (Boolean.parseBoolean(System.getProperty("hapi.validate_requests", "false"))) {
			FhirValidator validator = fhirContext.newValidator();
			validator.registerValidatorModule(spring.getBean(IInstanceValidatorModule.class));
			RequestValidatingInterceptor requests = new RequestValidatingInterceptor();
			requests.setValidator(validator);
			requests.setFailOnSeverity(ResultSeverityEnum.ERROR);
			requests.setAddResponseHeaderOnSeverity(ResultSeverityEnum.WARNING);
			requests.setAddValidationResultsToResponseOperationOutcome(true);
			server.registerInterceptor(requests);
			ourLog.info("request validation on: a create, update or transaction with an error is refused");
		}
	}

	/** The package's CodeSystems, ValueSets and StructureDefinitions into {@code into}; its "name#version". */
	private static String load(FhirContext fhirContext, Path tgz, PrePopulatedValidationSupport into) throws IOException {
		NpmPackage npm;
		try (InputStream in = Files.newInputStream(tgz)) {
			npm = NpmPackage.fromPackage(in);
		}
		int count = 0;
		for (String file : npm.listResources(LOADED_TYPES)) {
			try (InputStream resource = npm.loadResource(file)) {
				IBaseResource parsed = fhirContext.newJsonParser().parseResource(resource);
				into.addResource(parsed);
				count++;
			}
		}
		ourLog.info("package {}#{} from {}: {} resources", npm.name(), npm.version(), tgz, count);
		return npm.name() + "#" + npm.version();
	}
}
